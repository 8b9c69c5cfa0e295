"""Datasets: scikit-learn generators and CSV files, split and standardised (:mod:`.datasets`)."""
