"""Quantisation: Hessians, the grid, GPTQ, the policy, bit allocation, the .ptz format."""
