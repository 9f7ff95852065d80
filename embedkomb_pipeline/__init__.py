"""embedkomb_pipeline."""
