//! The readiness messages as systemd receives them, on a real datagram socket named by
//! `$NOTIFY_SOCKET`. One test in its own process: it sets the environment variable.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn recv(sock: &UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a datagram");
    String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect()
}

#[test]
fn ready_reloading_and_stopping_reach_the_socket() {
    use sluice::sdnotify;
    std::env::remove_var(sdnotify::NOTIFY_SOCKET);
    assert!(!sdnotify::ready("up").unwrap(), "without $NOTIFY_SOCKET nothing is sent");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::env::set_var(sdnotify::NOTIFY_SOCKET, &path);

    assert!(sdnotify::ready("enforcing").unwrap());
    assert_eq!(recv(&sock), ["READY=1", "STATUS=enforcing"]);
    assert!(sdnotify::reloading("reloading policies").unwrap());
    let lines = recv(&sock);
    assert_eq!(lines[0], "RELOADING=1");
    let usec: u64 = lines[1].strip_prefix("MONOTONIC_USEC=").unwrap().parse().unwrap();
    assert!(usec > 0);
    assert_eq!(lines[2], "STATUS=reloading policies");
    assert!(sdnotify::stopping("stopping").unwrap());
    assert_eq!(recv(&sock), ["STOPPING=1", "STATUS=stopping"]);

    // Nobody listening is an error the daemon logs, not a silent success.
    drop(sock);
    assert!(sdnotify::ready("up").is_err());
    // An abstract name is refused with a message that says why.
    std::env::set_var(sdnotify::NOTIFY_SOCKET, "@/org/freedesktop/systemd1/notify");
    let e = sdnotify::ready("up").unwrap_err();
    assert!(e.to_string().contains("abstract"), "{e}");
}
