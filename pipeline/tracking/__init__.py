"""Recording runs in MLflow: the run tracker, stores, model files.

The only package that imports mlflow.
"""
