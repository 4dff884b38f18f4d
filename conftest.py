pytest_plugins = ["aeterna_common.testing"]
