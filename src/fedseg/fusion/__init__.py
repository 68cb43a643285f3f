"""Multimodal fusion: tumour-region image features with clinical records, trained federated.

``features`` turns a case's label (and images) and its clinical record into fixed-length
vectors, ``model`` holds the pure numerical cores (logistic and Cox models, their local
gradient steps), ``metrics`` AUC, concordance and bootstrap intervals, ``site`` the ClientApp
handler of the ``train.fusion`` message, ``federated`` the server side (Flower's FedAvg) and
``study`` / ``report`` the ``fedseg fusion-study`` comparison.
"""
