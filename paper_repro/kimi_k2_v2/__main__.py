"""``python -m paper_repro.kimi_k2_v2 [--quick] [--preset gpu] [--out DIR]``."""

from .pipeline import main

if __name__ == "__main__":
    main()
