from deepstack_runtime.cli import main

main()
