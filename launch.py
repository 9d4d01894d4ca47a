"""Start DREAM Studio: `python launch.py [--model DIR] [--host 127.0.0.1] [--port 7860] [--share]
[--device auto|cpu|cuda] [--inbrowser] [--models-dir DIR] [--threads N]` (see `--help`)."""

from app.main import main

if __name__ == "__main__":
    main()
