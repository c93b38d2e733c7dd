"""Lightning callbacks: versioned checkpointing, progressive unfreezing, reports."""
