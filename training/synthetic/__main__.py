"""`python -m training.synthetic`: see tree.main."""

from .tree import main

if __name__ == "__main__":
    main()
