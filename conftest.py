def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole training run or more (minutes on CPU); -m 'not slow' skips it")
