//! Several loops on one UDP port, each packet steered to the loop that owns
//! its connection by connection ID, not by address.
//!
//! Loops share the port with `SO_REUSEPORT`. By default the kernel picks a
//! socket by a hash of the 4-tuple, which is stable only while the follower
//! keeps its address: after a NAT rebinding or a migration, its packets would
//! reach a loop that does not know the connection (and answers with a
//! stateless reset). So:
//!
//! - each loop issues connection IDs whose first byte, modulo the number of
//!   loops, is its own index (`cids::KeyedCids`, drawn until the byte
//!   fits);
//! - a classic BPF program on the port's reuseport group ([`attach`]) sends
//!   a short-header packet (every packet of an established connection) to
//!   socket `dcid[0] % loops`, and lets the kernel hash the 4-tuple for
//!   long-header packets (handshakes: the client's own random ID, same
//!   address throughout), by returning an index past the last socket.
//!
//! Sockets join the group in loop order, so socket index `i` is loop `i`.

pub use super::cids::MAX_LOOPS;

// Classic BPF opcodes (linux/filter.h): BPF_LD (0x00) | BPF_B | BPF_ABS.
const BPF_LD_B_ABS: u16 = 0x10 | 0x20;
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40;
const BPF_ALU_MOD_K: u16 = 0x04 | 0x90;
const BPF_RET_A: u16 = 0x06 | 0x10;
/// BPF_RET | BPF_K (0x00).
const BPF_RET_K: u16 = 0x06;
/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Attaches the steering program to the reuseport group of `fd` (one of the
/// group's sockets), for `loops` sockets.
pub fn attach(fd: std::os::fd::RawFd, loops: usize) -> std::io::Result<()> {
    let mut prog = [
        // A = first byte of the UDP payload (the QUIC header form bit).
        op(BPF_LD_B_ABS, 0, 0, 0),
        // Long header: let the kernel hash the 4-tuple.
        op(BPF_JMP_JSET_K, 3, 0, 0x80),
        // Short header: A = first byte of the destination connection ID.
        op(BPF_LD_B_ABS, 0, 0, 1),
        op(BPF_ALU_MOD_K, 0, 0, loops.clamp(1, MAX_LOOPS) as u32),
        op(BPF_RET_A, 0, 0, 0),
        // An index past the last socket: the kernel falls back to its hash.
        op(BPF_RET_K, 0, 0, u32::MAX),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel
    // copies the program.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
