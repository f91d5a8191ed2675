"""Method families: one file each, the equations at the top and the LightningModule below."""
