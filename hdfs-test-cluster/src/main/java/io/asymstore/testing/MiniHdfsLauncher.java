package io.asymstore.testing;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileOutputStream;
import java.io.FileDescriptor;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.atomic.AtomicBoolean;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.DFSConfigKeys;
import org.apache.hadoop.hdfs.MiniDFSCluster;

/**
 * Runs a one-NameNode, one-DataNode MiniDFSCluster on 127.0.0.1 for asymstore's tests and demos.
 *
 * <pre>
 * java -jar target/hdfs-test-cluster.jar DATA_DIR [--port N] [--block-size BYTES] [--datanodes N]
 * </pre>
 *
 * Protocol: stdout carries only protocol lines (everything else, Hadoop's logging included, goes to
 * stderr). When the cluster is up it prints {@code HDFS_URL=hdfs://127.0.0.1:PORT}. Commands on stdin,
 * one per line, each answered with {@code OK <command> ...} or {@code ERR <command> <message>}:
 * <ul>
 *   <li>{@code stop}: shut the cluster down and exit 0 (also on stdin EOF and on SIGTERM);</li>
 *   <li>{@code stop-namenode}: stop the NameNode, keep the DataNode (fault injection);</li>
 *   <li>{@code start-namenode}: restart the NameNode on the same port and wait until it serves writes;</li>
 *   <li>{@code ping}: answer {@code OK ping}.</li>
 * </ul>
 */
public final class MiniHdfsLauncher {
  private static final PrintStream PROTOCOL =
      new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);

  private static final AtomicBoolean STOPPED = new AtomicBoolean(false);
  private static volatile MiniDFSCluster cluster;

  private MiniHdfsLauncher() {}

  public static void main(String[] args) throws Exception {
    // Keep stdout for the protocol: anything Hadoop prints goes to stderr.
    System.setOut(System.err);

    String dataDir = null;
    int port = 0;
    long blockSize = 8L << 20;
    int dataNodes = 1;
    int closeCommitted = 0;
    int replication = 1;
    long ibrIntervalMs = 0;
    for (int i = 0; i < args.length; i++) {
      switch (args[i]) {
        case "--port": port = Integer.parseInt(args[++i]); break;
        case "--block-size": blockSize = Long.parseLong(args[++i]); break;
        case "--datanodes": dataNodes = Integer.parseInt(args[++i]); break;
        case "--close-committed": closeCommitted = Integer.parseInt(args[++i]); break;
        case "--replication": replication = Integer.parseInt(args[++i]); break;
        case "--ibr-interval-ms": ibrIntervalMs = Long.parseLong(args[++i]); break;
        case "-h": case "--help":
          System.err.println("usage: MiniHdfsLauncher DATA_DIR [--port N] [--block-size BYTES] [--datanodes N] [--replication N] [--close-committed N] [--ibr-interval-ms MS]");
          System.exit(0);
          break;
        default:
          if (dataDir != null || args[i].startsWith("--")) {
            System.err.println("unexpected argument: " + args[i]);
            System.exit(2);
          }
          dataDir = args[i];
      }
    }
    if (dataDir == null) {
      System.err.println("usage: MiniHdfsLauncher DATA_DIR [--port N] [--block-size BYTES] [--datanodes N] [--replication N] [--close-committed N] [--ibr-interval-ms MS]");
      System.exit(2);
    }

    Configuration conf = new Configuration();
    File base = new File(dataDir).getAbsoluteFile();
    // Loopback only, every service on an ephemeral port (the RPC port is chosen by the builder below).
    conf.set(DFSConfigKeys.DFS_NAMENODE_HTTP_ADDRESS_KEY, "127.0.0.1:0");
    conf.set(DFSConfigKeys.DFS_NAMENODE_HTTPS_ADDRESS_KEY, "127.0.0.1:0");
    conf.set(DFSConfigKeys.DFS_DATANODE_ADDRESS_KEY, "127.0.0.1:0");
    conf.set(DFSConfigKeys.DFS_DATANODE_HTTP_ADDRESS_KEY, "127.0.0.1:0");
    conf.set(DFSConfigKeys.DFS_DATANODE_IPC_ADDRESS_KEY, "127.0.0.1:0");
    conf.setBoolean("dfs.namenode.servicerpc-address.auto", false);
    // Small and quick.
    conf.setInt(DFSConfigKeys.DFS_REPLICATION_KEY, replication);
    conf.setInt(DFSConfigKeys.DFS_NAMENODE_REPLICATION_MIN_KEY, 1);
    conf.setLong(DFSConfigKeys.DFS_BLOCK_SIZE_KEY, blockSize);
    conf.setLong(DFSConfigKeys.DFS_NAMENODE_MIN_BLOCK_SIZE_KEY, 4096);
    conf.setInt(DFSConfigKeys.DFS_BYTES_PER_CHECKSUM_KEY, 512);
    conf.setBoolean(DFSConfigKeys.DFS_PERMISSIONS_ENABLED_KEY, false);
    conf.setLong(DFSConfigKeys.DFS_HEARTBEAT_INTERVAL_KEY, 1);
    conf.setInt(DFSConfigKeys.DFS_NAMENODE_SAFEMODE_EXTENSION_KEY, 0);
    conf.setInt(DFSConfigKeys.DFS_NAMENODE_HANDLER_COUNT_KEY, 4);
    conf.setInt(DFSConfigKeys.DFS_DATANODE_HANDLER_COUNT_KEY, 2);
    conf.setInt(DFSConfigKeys.DFS_DATANODE_SCAN_PERIOD_HOURS_KEY, -1);
    conf.setInt(DFSConfigKeys.DFS_DATANODE_DIRECTORYSCAN_INTERVAL_KEY, -1);
    conf.setLong(DFSConfigKeys.DFS_NAMENODE_DU_RESERVED_KEY, 0);
    conf.setBoolean("dfs.namenode.audit.log.async", false);
    // --close-committed N (HDFS-8999, default 0 = HDFS's default): let a client close a file whose last
    // block the pipeline acknowledged but no DataNode has reported yet. It removes the ~0.5 s complete()
    // retry that close() often hits (needs replication > 1), BUT hdfs-native readers then see such a
    // file as truncated (it does not ask the DataNode for the last block's visible length): a read
    // right after a NameNode restart returned 0 bytes. Only for latency experiments.
    conf.setInt("dfs.namenode.file.close.num-committed-allowed", closeCommitted);
    // --ibr-interval-ms (default 0 = immediate): batch the DataNodes' incremental block reports, i.e.
    // delay the NameNode learning about finished blocks (fault injection for the case above).
    conf.setLong("dfs.blockreport.incremental.intervalMsec", ibrIntervalMs);
    conf.setBoolean("dfs.namenode.acls.enabled", false);
    // The DataNode retries a stopped NameNode quickly and quietly.
    conf.setInt("ipc.client.connect.max.retries", 1);
    conf.setInt("ipc.client.connect.retry.interval", 200);
    conf.setInt("ipc.client.connect.max.retries.on.timeouts", 1);

    long t0 = System.nanoTime();
    MiniDFSCluster c = new MiniDFSCluster.Builder(conf, base)
        .nameNodePort(port)
        .numDataNodes(dataNodes)
        .storagesPerDatanode(1)
        .format(true)
        .build();
    cluster = c;
    c.waitActive();
    int rpcPort = c.getNameNodePort();

    Runtime.getRuntime().addShutdownHook(new Thread(MiniHdfsLauncher::shutdown, "minidfs-shutdown"));

    System.err.printf("MiniDFSCluster up in %.2f s (data in %s)%n", (System.nanoTime() - t0) / 1e9, base);
    PROTOCOL.println("HDFS_URL=hdfs://127.0.0.1:" + rpcPort);

    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    String line;
    while ((line = in.readLine()) != null) {
      String cmd = line.trim();
      if (cmd.isEmpty()) {
        continue;
      }
      try {
        switch (cmd) {
          case "stop":
            shutdown();
            PROTOCOL.println("OK stop");
            System.exit(0);
            break;
          case "ping":
            PROTOCOL.println("OK ping");
            break;
          case "stop-namenode":
            c.shutdownNameNode(0);
            PROTOCOL.println("OK stop-namenode");
            break;
          case "start-namenode": {
            long t1 = System.nanoTime();
            c.restartNameNode(0, true);
            c.waitActive();
            while (c.getNameNode(0).isInSafeMode()) {
              Thread.sleep(50);
            }
            PROTOCOL.printf("OK start-namenode port=%d seconds=%.2f%n",
                c.getNameNodePort(), (System.nanoTime() - t1) / 1e9);
            break;
          }
          default:
            PROTOCOL.println("ERR " + cmd + " unknown command (stop, stop-namenode, start-namenode, ping)");
        }
      } catch (Exception e) {
        e.printStackTrace();
        PROTOCOL.println("ERR " + cmd + " " + e.toString().replace('\n', ' '));
      }
    }
    // stdin closed: the parent went away.
    shutdown();
    System.exit(0);
  }

  private static void shutdown() {
    MiniDFSCluster c = cluster;
    if (c != null && STOPPED.compareAndSet(false, true)) {
      try {
        c.shutdown();
      } catch (Throwable t) {
        System.err.println("shutdown (errors here during JVM exit are harmless): " + t);
      }
    }
  }
}
