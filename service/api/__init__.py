"""HTTP routes (one module per area) and the auth dependency."""
