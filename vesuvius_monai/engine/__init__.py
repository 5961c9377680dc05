"""Training, inference and test-time augmentation engines."""
