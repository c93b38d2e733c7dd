"""What every saved file carries, reading and writing each format, and the versioned registry."""
