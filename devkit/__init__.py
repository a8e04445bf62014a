"""Local-run and test helpers shared by tests, hack/ and benchmarks/; never shipped.

The wheel and the images hold deepstack_operator and deepstack_runtime only
(pyproject.toml, Dockerfile); import-linter keeps those two from importing this package
or `tests`, and this package from importing `tests`. What only the tests use stays in
tests/support."""
