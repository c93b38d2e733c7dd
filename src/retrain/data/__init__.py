"""ImageFolder discovery and splitting, transform presets, demo data and validation."""
