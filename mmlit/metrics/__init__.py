"""Metrics of the shipped tasks that torchmetrics does not have: VQA accuracy, CIDEr-D, retrieval recall@K with several
captions per image."""
