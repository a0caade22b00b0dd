"""Vol-JEPA pretraining: masks, data path, the JEPA step, checkpoints, monitors and the loop."""
