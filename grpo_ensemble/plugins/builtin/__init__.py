"""The built-in plugins: ordinary plugins of the same hooks a third party implements."""
