"""fedseg: federated learning for brain-tumour segmentation on multimodal MRI."""

__version__ = "0.1.0"
