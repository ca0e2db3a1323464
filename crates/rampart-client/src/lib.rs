//! rampart-client
