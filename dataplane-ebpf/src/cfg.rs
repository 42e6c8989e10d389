//! Load-time configuration, set by the loader through `EbpfLoader::set_global` (not compile-time
//! features): the node's addresses, the NodePort range, the hairpin SNAT address and the
//! conntrack lifetimes.
//!
//! Every read goes through `read_volatile` so the compiler cannot fold the defaults below into
//! the code: the loader rewrites them in the object's data before the programs are loaded.

/// Up to [`NODE_IPS_MAX`] IPv4 node addresses in network order; the first [`NODE_IP_COUNT`] count.
#[unsafe(no_mangle)]
static NODE_IPS: [u32; NODE_IPS_MAX] = [0; NODE_IPS_MAX];
#[unsafe(no_mangle)]
static NODE_IP_COUNT: u32 = 0;
/// The NodePort range, inclusive, host order (kube-apiserver's --service-node-port-range).
#[unsafe(no_mangle)]
static NODEPORT_MIN: u16 = 30000;
#[unsafe(no_mangle)]
static NODEPORT_MAX: u16 = 32767;
/// Source address given to a pod's packet that its own Service sent back to it (hairpin): the
/// pod must not see its own address as the source, which the stack drops as martian.
#[unsafe(no_mangle)]
static HAIRPIN_SNAT_IP: u32 = 0;

/// Conntrack lifetimes in seconds (`dataplane_common::ct::CtLifetimes`; defaults as there).
#[unsafe(no_mangle)]
static CT_LIFETIME_TCP_SYN_S: u32 = 60;
#[unsafe(no_mangle)]
static CT_LIFETIME_TCP_ESTABLISHED_S: u32 = 21_600;
#[unsafe(no_mangle)]
static CT_LIFETIME_TCP_CLOSE_S: u32 = 10;
#[unsafe(no_mangle)]
static CT_LIFETIME_OTHER_S: u32 = 60;

pub const NODE_IPS_MAX: usize = 4;

#[inline(always)]
fn read<T: Copy>(v: &T) -> T {
    // SAFETY: a valid reference to a static.
    unsafe { core::ptr::read_volatile(v) }
}

/// Whether `addr` (network order) is one of this node's addresses.
#[inline(always)]
pub fn is_node_ip(addr: u32) -> bool {
    let count = read(&NODE_IP_COUNT) as usize;
    let mut i = 0;
    while i < NODE_IPS_MAX {
        if i < count && read(&NODE_IPS[i]) == addr {
            return true;
        }
        i += 1;
    }
    false
}

/// The node address external traffic to a remote backend is SNATed to when it did not arrive on a
/// node address (LoadBalancer IPs, externalIPs): the first configured one, or `None`.
#[inline(always)]
pub fn primary_node_ip() -> Option<u32> {
    if read(&NODE_IP_COUNT) == 0 { None } else { Some(read(&NODE_IPS[0])) }
}

/// Whether `port_be` (network order) is in the NodePort range.
#[inline(always)]
pub fn in_nodeport_range(port_be: u16) -> bool {
    let p = u16::from_be(port_be);
    p >= read(&NODEPORT_MIN) && p <= read(&NODEPORT_MAX)
}

#[inline(always)]
pub fn hairpin_snat_ip() -> u32 {
    read(&HAIRPIN_SNAT_IP)
}

/// The conntrack lifetimes the agent configured.
#[inline(always)]
pub fn ct_lifetimes() -> dataplane_common::ct::CtLifetimes {
    dataplane_common::ct::CtLifetimes {
        tcp_syn_s: read(&CT_LIFETIME_TCP_SYN_S),
        tcp_established_s: read(&CT_LIFETIME_TCP_ESTABLISHED_S),
        tcp_close_s: read(&CT_LIFETIME_TCP_CLOSE_S),
        other_s: read(&CT_LIFETIME_OTHER_S),
    }
}
