"""Pure torch: models, data, inner and outer optimizers, checkpoints. Never imports hivemind or the network."""
