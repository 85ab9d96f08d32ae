"""Detection and segmentation heads: RPN, RoI box head, mask head, semantic head."""
__all__: list[str] = []
