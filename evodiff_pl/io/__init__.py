"""Reading and writing models: the checkpoint format and export (`checkpointing`), NVlabs pickles (`nvlabs`)."""
