"""Measuring runs: sample sets (seeded, split over ranks, kept on disk), FID / IS / precision-recall
(fidelity), tokenizer reconstructions (reconstruction), latent statistics and the trainer's warnings
(diagnostics)."""
