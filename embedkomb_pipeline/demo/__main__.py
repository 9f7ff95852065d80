"""`python -m embedkomb_pipeline.demo`: one whole cycle on the bundled sample (see runner.py)."""

from embedkomb_pipeline.demo.runner import main

if __name__ == "__main__":
    main()
