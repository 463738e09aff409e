"""``python -m mcpface``."""

from mcpface.app import main

if __name__ == "__main__":
    main()
