"""The `hive` command line. Importing it stays light: commands import the library lazily."""
