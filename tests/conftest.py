pytest_plugins = ["tests.httpserver", "tests.upstreams.fixtures"]
