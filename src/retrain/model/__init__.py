"""ResNet construction, surgery (stages, freezing, head replacement) and the LightningModule."""
