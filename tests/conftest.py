pytest_plugins = ["tests.httpserver"]
