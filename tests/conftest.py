pytest_plugins = ["tests.hdfs_fixtures"]
