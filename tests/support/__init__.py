"""What the tests share: models, checks, sweep configurations, pytest plugins and the worker
processes the multi-rank tests start. pyproject.toml puts tests/ on pytest's sys.path, so tests
import it as `support`; a worker runs as `python -m support.<name>` from tests/."""
