"""One function per CLI task; each composes objects from the config and runs them."""
