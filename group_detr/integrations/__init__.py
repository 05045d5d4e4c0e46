"""Adapters that put GroupMatcher behind other libraries' matcher interfaces.

Each adapter is imported on its own (`group_detr.integrations.transformers`), so that importing
group_detr never needs the library it adapts.
"""
