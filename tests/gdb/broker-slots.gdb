# gdb -batch -p BROKER_PID -x tests/gdb/broker-slots.gdb
# The broker's private view of every connection and attached client, to set
# beside what a stuck worker sees in the segment.
set $i = 0
while $i < B.nslots
  set $c = B.slots[$i]
  if $c != 0
    printf "slot %d: state %d expect %u sending %d resetting %d validating %d deferred %d cancel_inflight %d broken %d acked %u | segment req_seq %u req_ack %u word %lx | cmd_word %lx release_pending %d await_cancel %d watch %d to_sink %d recv %d send %d\n", $i, $c->state, $c->expect, $c->sending, $c->resetting, $c->validating, $c->submit_deferred, $c->cancel_inflight, $c->broken, $c->acked_seq, $c->slot->req_seq, $c->slot->req_ack, $c->slot->word, $c->cmd_word, $c->release_pending, $c->await_cancel, $c->watch, $c->to_sink, $c->recv_op.pending, $c->send_op.pending
  end
  set $i = $i + 1
end
set $k = 0
while $k < B.nattached
  set $j = B.active[$k]
  printf "client %u: id %x pid %d sq_head %u | segment id %x sq_head %u sq_tail %u\n", $j, B.clients[$j].id, B.clients[$j].pid, B.clients[$j].sq_head, B.shm_clients[$j].id, B.shm_clients[$j].sq_head, B.shm_clients[$j].sq_tail
  set $k = $k + 1
end
printf "sq_seq %u (last scanned %u), broker_sleeping %u\n", B.hdr->sq_seq, B.last_sq_seq, B.hdr->broker_sleeping
