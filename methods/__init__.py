"""OOD scoring methods: one small fit/score interface and a name registry."""
