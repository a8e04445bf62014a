"""Moving buffer blocks between pools: one Transport interface, Mooncake beside it."""
