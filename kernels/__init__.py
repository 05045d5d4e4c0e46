"""Triton kernels of group-detr, installed as the subpackage `group_detr.kernels`.

Import the kernel modules explicitly (`from group_detr.kernels import grouped_attention`); this
package itself imports nothing, so `import group_detr` never needs Triton.
"""
