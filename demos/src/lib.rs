//! Unikernel applications. The network demos arrive with the driver-stack issue.
#![no_std]
