"""The training flow: `run` builds and fits, `module` is the LightningModule, with its losses, EMA and resume rules."""
