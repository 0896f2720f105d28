"""Azure: the Azure ML model registry (upload) and the Azure Blob DVC remote with its local emulator, Azurite."""
