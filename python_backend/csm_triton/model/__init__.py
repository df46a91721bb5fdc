"""The model: hyperparameters and audio facts (`config`, torch-free), the CSM transformer
(`model`), sampling (`sampling`), weights on disk (`checkpoint`) and Mimi (`codec`).

The bottom layer: it imports nothing else of csm_triton. This file imports nothing, so that the
torch-free `config` imports without torch.
"""
