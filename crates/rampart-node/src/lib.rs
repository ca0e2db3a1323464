//! rampart-node
