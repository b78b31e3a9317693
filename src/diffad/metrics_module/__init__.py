"""evaluate.Metric module for anomaly detection (loaded offline with evaluate.load(<this folder>))."""
