"""From the federation to the clinic: DICOM import, model cards, one-patient prediction, serving.

Modules
-------
``dicom``
    A folder of DICOM files (any names, one or many patients) to BraTS 2021 case folders.
``dicom_write``
    NIfTI volume to an MR DICOM series (pydicom), for round-trip tests and benchmarks.
``card``
    The manifest (model card) written beside every exported model, and its checks.
``predict``
    One patient's segmentation: NIfTI label map, DICOM SEG, region volumes, overlay PNG.
``serve``
    The local HTTP service (FastAPI) around ``predict``.
"""
