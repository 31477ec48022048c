//! Store backends.
