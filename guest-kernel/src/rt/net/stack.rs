//! The smoltcp side of a NIC, the same for every NIC type: the interface
//! with its static address and default route, the socket set, and the DHCP
//! client's lease.

use super::config::NetConfig;
use super::nic::Nic;
use crate::rt::time;
use alloc::vec::Vec;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::dhcpv4;
use smoltcp::wire::{HardwareAddress, IpCidr};

/// The interface over `nic` with `cfg`'s static address, default route and
/// DHCP client.
pub fn build(
    nic: &mut dyn Nic,
    cfg: &NetConfig,
) -> (Interface, SocketSet<'static>, Option<SocketHandle>) {
    let config = Config::new(HardwareAddress::Ethernet(nic.mac()));
    let mut iface = nic.interface(config, now());
    if let Some(addr) = cfg.address {
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::Ipv4(addr));
        });
    }
    if let Some(gw) = cfg.gateway {
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }
    let mut sockets = SocketSet::new(Vec::new());
    let dhcp = cfg.dhcp.then(|| sockets.add(dhcpv4::Socket::new()));
    (iface, sockets, dhcp)
}

/// smoltcp's clock: microseconds of the TSC.
pub fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(i64::try_from(time::now_ns() / 1000).unwrap_or(i64::MAX))
}

/// Applies what the DHCP client of NIC `index` reports: a new lease sets the
/// address and default route, a lost one clears the address.
pub fn follow_dhcp(
    index: usize,
    iface: &mut Interface,
    sockets: &mut SocketSet<'static>,
    dhcp: SocketHandle,
) {
    match sockets.get_mut::<dhcpv4::Socket>(dhcp).poll() {
        Some(dhcpv4::Event::Configured(c)) => {
            iface.update_ip_addrs(|a| {
                a.clear();
                let _ = a.push(IpCidr::Ipv4(c.address));
            });
            if let Some(r) = c.router {
                let _ = iface.routes_mut().add_default_ipv4_route(r);
            }
            log::info!(
                "net{index}: DHCP gave {} (router {:?})",
                c.address,
                c.router
            );
        }
        // smoltcp reports Deconfigured once at start as well; only a
        // lease that existed is worth a warning.
        Some(dhcpv4::Event::Deconfigured) if iface.ipv4_addr().is_some() => {
            #[allow(clippy::redundant_closure_for_method_calls)]
            // the Vec type is smoltcp-internal
            iface.update_ip_addrs(|a| a.clear());
            log::warn!("net{index}: DHCP lease lost");
        }
        Some(dhcpv4::Event::Deconfigured) | None => {}
    }
}
