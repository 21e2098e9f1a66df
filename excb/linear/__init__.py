"""The paper's linear evaluation: a linear head trained on the frozen teacher backbone (``excb linear``)."""
