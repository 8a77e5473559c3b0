"""Around the model: training a tokenizer (tokenizer_training), latent caches (latent_cache), and the official
implementation's configurations and checkpoints (official)."""
